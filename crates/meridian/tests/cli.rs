//! The `meridian` binary as users run it: crash durability and the README's first
//! five minutes (`meridian up`, then kubectl).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "cli/kubectl.rs"]
mod kubectl_suite;

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn meridian(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start meridian"),
    )
}

fn https(dir: &Path) -> reqwest::Client {
    let ca = std::fs::read(dir.join("pki/ca.crt")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
}

async fn wait_ready(url: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if dir.join("pki/ca.crt").exists()
            && dir.join("admin.token").exists()
            && let Ok(r) = https(dir).get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two `meridian server` processes sharing one etcd: 1,000 concurrent DELETEs of
/// one Deployment's pods, spread over both, against "1 per 30 minutes": exactly
/// one goes through, and still only one after a server restarts. The budget lives
/// only in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_on_one_etcd_let_exactly_one_of_a_thousand_deletes_through() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = meridian_store::etcd_server::EtcdServer::start(dir.path())
        .await
        .unwrap();
    let listens = [free_port(), free_port()].map(|p| format!("127.0.0.1:{p}"));
    let start = |i: usize| {
        let d = dir.path().join(format!("server-{i}"));
        meridian(&[
            "server",
            "--data-dir",
            d.to_str().unwrap(),
            "--listen",
            &listens[i],
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.client_url,
            // No controllers: they would replace (and trim) this hand-made layout.
            "--api-only",
        ])
    };
    let mut servers = Vec::new();
    for (i, listen) in listens.iter().enumerate() {
        let d = dir.path().join(format!("server-{i}"));
        let url = format!("https://{listen}");
        let proc = start(i);
        wait_ready(&url, &d).await;
        let token = std::fs::read_to_string(d.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        servers.push((proc, url, token, https(&d)));
    }
    let (url, token, http) = (
        servers[0].1.clone(),
        servers[0].2.clone(),
        servers[0].3.clone(),
    );
    let (url, token, http) = (&url, &token, &http);
    let post = |path: &str, body: Value| {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        let path = path.to_owned();
        async move {
            let r = http
                .post(format!("{url}{path}"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "{path}: {}",
                r.text().await.unwrap()
            );
            r.json::<Value>().await.unwrap()
        }
    };
    let labels = json!({"app": "web"});
    let template = json!({"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    let d = post(
        "/apis/apps/v1/namespaces/default/deployments",
        json!({"metadata": {"name": "web"},
        "spec": {"replicas": 100, "selector": {"matchLabels": labels}, "template": template}}),
    )
    .await;
    let owner = |kind: &str, name: &str, uid: &Value| {
        json!([{"apiVersion": "apps/v1", "kind": kind,
        "name": name, "uid": uid, "controller": true}])
    };
    let rs = post(
        "/apis/apps/v1/namespaces/default/replicasets",
        json!({"metadata": {"name": "web-1",
        "ownerReferences": owner("Deployment", "web", &d["metadata"]["uid"])},
        "spec": {"replicas": 100, "selector": {"matchLabels": labels}, "template": template}}),
    )
    .await;
    for i in 0..100 {
        post("/api/v1/namespaces/default/pods", json!({"metadata": {"name": format!("web-1-{i}"),
            "labels": labels, "ownerReferences": owner("ReplicaSet", "web-1", &rs["metadata"]["uid"])},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}})).await;
    }
    post("/apis/meridian.io/v1alpha1/namespaces/default/riskpolicies", json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "RiskPolicy", "metadata": {"name": "web-safety"},
        "spec": {"selector": {"kinds": ["Deployment"], "names": ["web"]},
            "rules": {"maxDeletions": [{"count": 1, "period": "30m"}]}}})).await;
    // The second server must have seen the policy: poll it there.
    let (url1, token1, http1) = (
        servers[1].1.clone(),
        servers[1].2.clone(),
        servers[1].3.clone(),
    );
    let (url1, token1, http1) = (&url1, &token1, &http1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http1
        .get(format!(
            "{url1}/apis/meridian.io/v1alpha1/namespaces/default/riskpolicies/web-safety"
        ))
        .bearer_auth(token1)
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the policy never reached server 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reqs = Vec::new();
    for round in 0..10 {
        for i in 0..100 {
            let (_, url, token, http) = &servers[(i + round) % 2];
            reqs.push(
                http.delete(format!("{url}/api/v1/namespaces/default/pods/web-1-{i}"))
                    .bearer_auth(token)
                    .send(),
            );
        }
    }
    let codes: Vec<u16> = futures::future::join_all(reqs)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let count = |c: u16| codes.iter().filter(|x| **x == c).count();
    assert_eq!(count(200), 1, "{codes:?}");
    assert_eq!(count(429) + count(404), 999, "{codes:?}");
    let list: Value = http1
        .get(format!("{url1}/api/v1/namespaces/default/pods"))
        .bearer_auth(token1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // 99 of the 100 are left (API only: nothing replaces the one that went).
    let originals = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let n = p["metadata"]["name"].as_str().unwrap();
            n.strip_prefix("web-1-")
                .is_some_and(|i| i.parse::<u32>().is_ok_and(|i| i < 100))
        })
        .count();
    assert_eq!(originals, 99);
    // The count survives a restart: it is only in etcd.
    servers[0].0.0.kill().unwrap();
    servers[0].0.0.wait().unwrap();
    servers[0].0 = start(0);
    wait_ready(url, &dir.path().join("server-0")).await;
    let survivor = list["items"][0]["metadata"]["name"].as_str().unwrap();
    let r = http
        .delete(format!("{url}/api/v1/namespaces/default/pods/{survivor}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        429,
        "after a restart: {}",
        r.text().await.unwrap()
    );
    drop(servers);
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("https://{listen}");
    let mut server = meridian(&["server", "--data-dir", &d, "--listen", &listen]);
    wait_ready(&url, dir.path()).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let http = https(dir.path());
    // Concurrent writers, so acknowledgements come out of group commits.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let pod = json!({"metadata": {"name": format!("p{i}")}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
            let r = http.post(format!("{url}/api/v1/namespaces/default/pods")).bearer_auth(token.trim()).json(&pod).send().await.unwrap();
            r.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    // SIGKILL: no shutdown hook runs.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let _server = meridian(&["server", "--data-dir", &d, "--listen", &listen]);
    wait_ready(&url, dir.path()).await;
    let list: Value = http
        .get(format!("{url}/api/v1/namespaces/default/pods"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 64, "every acknowledged create is still there");
}

/// Every non-empty value of `want` is in `got` at the same place.
fn assert_contains(want: &serde_json::Value, got: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (want, got) {
        (Value::Null, _) => {}
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                if k == "status" || v.is_null() || v.as_object().is_some_and(|o| o.is_empty()) {
                    continue;
                }
                let next = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}.{k} missing in {got}"));
                assert_contains(v, next, &format!("{at}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{at}: {want} vs {got}");
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                assert_contains(a, b, &format!("{at}[{i}]"));
            }
        }
        (w, g) => assert_eq!(w, g, "{at}"),
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl must be installed (the test command checks it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridian_up_then_kubectl_apply_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(dir.path());
    let _log = LogOnPanic(dir.path().join("up.log"));
    let (_up, kubeconfig) = up(dir.path()).await;
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/web-deployment.yaml"
    );
    let (ok, out) = kubectl(&kubeconfig, &["apply", "-f", example]);
    assert!(ok, "{out}");
    assert!(out.contains("deployment.apps/web created"), "{out}");
    // kubectl validates on the server (OpenAPI v3 offers fieldValidation): an
    // unknown field is refused, and nothing changes.
    let typo = std::fs::read_to_string(example)
        .unwrap()
        .replace("  replicas: 3\n", "  replicas: 3\n  replicaz: 4\n");
    let typo_path = dir.path().join("web-typo.yaml");
    std::fs::write(&typo_path, typo).unwrap();
    let (ok, out) = kubectl(&kubeconfig, &["apply", "-f", typo_path.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains(r#"unknown field "spec.replicaz""#), "{out}");
    // kubectl auth can-i answers by the rules requests are authorised with, and
    // `get all` lists the workloads.
    let (ok, out) = kubectl(&kubeconfig, &["auth", "can-i", "create", "pods"]);
    assert!(ok && out.contains("yes"), "{out}");
    let (ok, out) = kubectl(&kubeconfig, &["auth", "can-i", "delete", "nodes"]);
    assert!(
        !ok && out.contains("no"),
        "a tenant cannot delete nodes: {out}"
    );
    let (ok, out) = kubectl(&kubeconfig, &["get", "all"]);
    assert!(ok && out.contains("deployment.apps/web"), "{out}");
    // Imperative creates (kubectl sends these as protobuf): each stored object holds
    // everything kubectl itself renders for the same command.
    let creates: [(&[&str], &str, &str); 6] = [
        (
            &[
                "create",
                "configmap",
                "app-config",
                "--from-literal=mode=edge",
                "--from-literal=level=3",
            ],
            "configmap",
            "app-config",
        ),
        (
            &[
                "create",
                "secret",
                "generic",
                "db",
                "--from-literal=password=s3cret",
                "--type=Opaque",
            ],
            "secret",
            "db",
        ),
        (
            &[
                "create",
                "deployment",
                "hello",
                "--image=meridian.local/busybox:1",
                "--replicas=2",
                "--port=8080",
            ],
            "deployment",
            "hello",
        ),
        (&["create", "namespace", "team-b"], "namespace", "team-b"),
        (
            &[
                "create",
                "job",
                "once",
                "--image=meridian.local/busybox:1",
                "--",
                "echo",
                "hi",
            ],
            "job",
            "once",
        ),
        (
            &["create", "service", "clusterip", "hello", "--tcp=80:8080"],
            "service",
            "hello",
        ),
    ];
    for (args, kind, name) in creates {
        let (ok, out) = kubectl(&kubeconfig, args);
        assert!(ok, "kubectl {args:?}: {out}");
        // The flags go before a `--` (after it they would be the container's args).
        let mut dry = args.to_vec();
        let at = dry.iter().position(|a| *a == "--").unwrap_or(dry.len());
        dry.splice(at..at, ["--dry-run=client", "-o", "json"]);
        let (ok, rendered) = kubectl(&kubeconfig, &dry);
        assert!(ok, "{rendered}");
        let want: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        let got = get_json(&kubeconfig, &[kind, name]);
        assert_contains(&want, &got, kind);
    }
    let cm = get_json(&kubeconfig, &["configmap", "app-config"]);
    assert_eq!(cm["data"]["mode"], "edge");
    let (ok, out) = kubectl(
        &kubeconfig,
        &[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "3");
    // Re-applying an edited manifest sends a strategic merge patch: the container
    // is merged by name (its probe and resources stay), env by name.
    let edited = std::fs::read_to_string(example)
        .unwrap()
        .replace("replicas: 3", "replicas: 4")
        .replace("image: busybox:1.36", "image: busybox:1.37")
        .replace(
            "          env:\n",
            "          env:\n            - name: GREETING\n              value: hello\n",
        );
    let edited_path = dir.path().join("web-edited.yaml");
    std::fs::write(&edited_path, edited).unwrap();
    let (ok, out) = kubectl(&kubeconfig, &["apply", "-f", edited_path.to_str().unwrap()]);
    assert!(ok && out.contains("configured"), "{out}");
    let (ok, out) = kubectl(
        &kubeconfig,
        &["set", "image", "deployment/web", "web=busybox:1.38"],
    );
    assert!(ok, "{out}");
    let d = get_json(&kubeconfig, &["deployment", "web"]);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(d["spec"]["replicas"], 4);
    assert_eq!(c["image"], "busybox:1.38");
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(env, ["GREETING", "POD_NAME", "NODE_NAME"], "{c}");
    assert_eq!(c["resources"]["requests"]["cpu"], "100m", "{c}");
    assert!(c["readinessProbe"]["exec"].is_object(), "{c}");
    let (ok, out) = kubectl(&kubeconfig, &["get", "namespaces", "-o", "name"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.trim(),
        "namespace/default\nnamespace/team-b",
        "the tenant sees only its own namespaces"
    );
    let (ok, out) = kubectl(&kubeconfig, &["delete", "deployment", "web"]);
    assert!(ok, "{out}");

    // real nodes in several cities, visible to the tenant
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = kubectl(&kubeconfig, &["get", "nodes", "-o", "name"]);
        if ok && out.lines().count() == 5 + SIMULATED {
            assert!(
                out.contains("node/paris-1")
                    && out.contains("node/tokyo-1")
                    && out.contains("node/sim-seoul-gpu"),
                "{out}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "meridian up did not bring 5 + {SIMULATED} nodes: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // kubectl get prints the server's tables: nodes with region and city.
    let (ok, out) = kubectl(&kubeconfig, &["get", "nodes"]);
    assert!(ok, "{out}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "STATUS", "REGION", "CITY", "AGE"], "{out}");
    let paris = out.lines().find(|l| l.starts_with("paris-1 ")).unwrap();
    let cells: Vec<&str> = paris.split_whitespace().collect();
    assert_eq!(&cells[1..4], ["Ready", "eu-west", "Paris"], "{out}");
    // a pod bound to a node runs there and its logs come back through kubectl
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/hello-pod.yaml");
    let (ok, out) = kubectl(&kubeconfig, &["apply", "-f", hello]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = kubectl(&kubeconfig, &["logs", "hello"]);
        if ok && out.contains("hello from paris-1 in default") && out.contains("tick 1") {
            let (ok, out) = kubectl(&kubeconfig, &["get", "pod", "hello", "-o", "wide"]);
            assert!(ok, "{out}");
            let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
            assert_eq!(row[0], "hello", "{out}");
            assert!(row[1].ends_with("/1"), "ready/total: {out}");
            // Logs come from the agent directly, the phase through the region's
            // batched status writes: the second can be a moment behind.
            if row[2] != "Running" {
                assert!(Instant::now() < deadline, "never Running: {out}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(
                &row[row.len() - 2..],
                ["paris-1", "Paris"],
                "node and city: {out}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no logs from the hello pod: {out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, out) = kubectl(&kubeconfig, &["delete", "pod", "hello"]);
    assert!(ok, "{out}");

    // the Deployment example is scheduled over three cities and runs. Pods of the
    // first, deleted, Deployment still being collected would count in the spread
    // (they carry app=web): wait for them to go first.
    wait_for("the first web Deployment's pods are collected", 60, || {
        let (_, out) = kubectl(&kubeconfig, &["get", "pods", "-l", "app=web", "-o", "name"]);
        if out.trim().is_empty() || out.contains("No resources found") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let (_, before) = kubectl(&kubeconfig, &["get", "pods", "-l", "app=web", "-o", "name"]);
    let before: std::collections::BTreeSet<String> = before
        .lines()
        .map(|l| l.trim_start_matches("pod/").to_owned())
        .collect();
    let (ok, out) = kubectl(&kubeconfig, &["apply", "-f", example]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = kubectl(
            &kubeconfig,
            &[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.spec.nodeName}{\"\\n\"}{end}",
            ],
        );
        let running: std::collections::BTreeSet<&str> = out
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let (name, phase, node) = (f.next()?, f.next()?, f.next()?);
                (phase == "Running" && !before.contains(name)).then_some(node)
            })
            .collect();
        if ok && running.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web replicas not running on 3 nodes: {out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, out) = kubectl(&kubeconfig, &["delete", "deployment", "web"]);
    assert!(ok, "{out}");
}

/// Simulated nodes of `meridian up`: two per city, 7 cities in eu-west, 8 in
/// ap-northeast and us-east.
const SIMULATED: usize = 46;

/// Starts `meridian up`; returns its data dir and the demo tenant's kubeconfig.
async fn up(dir: &Path) -> (Proc, std::path::PathBuf) {
    up_with(dir, &[]).await
}

/// `meridian up` with extra arguments.
async fn up_with(dir: &Path, extra: &[&str]) -> (Proc, std::path::PathBuf) {
    let d = dir.to_str().unwrap().to_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("https://{listen}");
    let log = std::fs::File::create(dir.join("up.log")).unwrap();
    let p = Proc(
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["up", "--data-dir", &d, "--listen", &listen])
            .args(["--center-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start meridian"),
    );
    wait_ready(&url, dir).await;
    let kubeconfig = dir.join("tenants/demo.kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(
            Instant::now() < deadline,
            "meridian up wrote no tenant kubeconfig"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (p, kubeconfig)
}

/// `kubectl get -o json`, parsed.
fn get_json(kubeconfig: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let (ok, out) = kubectl(kubeconfig, &a);
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Waits up to `secs` for `check` to say yes, showing its last answer on timeout.
async fn wait_for(what: &str, secs: u64, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check() {
            Ok(()) => return,
            Err(last) => assert!(Instant::now() < deadline, "{what}: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn example(name: &str) -> String {
    format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridian_up_gives_each_placement_example_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(dir.path());
    let _log = LogOnPanic(dir.path().join("up.log"));
    let (_up, kc) = up(dir.path()).await;
    let kc = kc.as_path();
    // node -> labels, once every node is there
    let mut nodes: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    wait_for("all nodes registered", 60, || {
        let list = get_json(kc, &["nodes"]);
        nodes = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["metadata"]["name"].as_str().unwrap().to_owned(),
                    n["metadata"]["labels"].clone(),
                )
            })
            .collect();
        (nodes.len() == 5 + SIMULATED)
            .then_some(())
            .ok_or(format!("{} nodes", nodes.len()))
    })
    .await;
    let label = |node: &str, key: &str| -> String {
        nodes
            .get(node)
            .and_then(|l| l[key].as_str())
            .unwrap_or("")
            .to_owned()
    };
    for f in [
        "cloud-gaming.yaml",
        "api-two-regions.yaml",
        "cdn-log-daemonset.yaml",
        "load-test-job.yaml",
    ] {
        let (ok, out) = kubectl(kc, &["apply", "-f", &example(f)]);
        assert!(ok, "{f}: {out}");
    }
    // (node, phase) of the pods with this label
    let pods = |sel: &str| -> Vec<(String, String, serde_json::Value)> {
        get_json(kc, &["pods", "-l", sel])["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
                    p["status"]["phase"].as_str().unwrap_or("").to_owned(),
                    p["metadata"]["annotations"].clone(),
                )
            })
            .collect()
    };

    // Cloud gaming: 4 GPU servers, each player city within 10 ms of one.
    wait_for("game servers on GPU nodes, latency met", 90, || {
        let p = pods("app=game-server");
        let running: Vec<_> = p.iter().filter(|p| p.1 == "Running").collect();
        if running.len() != 4 {
            return Err(format!("{p:?}"));
        }
        for (node, _, ann) in &running {
            assert!(node.ends_with("-gpu"), "{node} has no GPU");
            assert_eq!(ann["meridian.io/reschedule-grace"], "60s", "failover grace");
        }
        let pp = get_json(kc, &["placementpolicy", "game-server"]);
        let objectives = pp["status"]["objectives"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let met = objectives
            .iter()
            .filter(|o| o["type"] == "Latency" && o["met"] == true)
            .count();
        (met == 4).then_some(()).ok_or(format!("{}", pp["status"]))
    })
    .await;

    // Risk control on the game servers: kubectl gets the refusal at once, with the
    // policy, the rule and when the budget frees up (no client-side waiting).
    let (ok, out) = kubectl(kc, &["apply", "-f", &example("game-server-safety.yaml")]);
    assert!(ok, "{out}");
    let game: Vec<String> = get_json(kc, &["pods", "-l", "app=game-server"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    let (first_ok, first) = kubectl(kc, &["delete", "pod", &game[0], "--wait=false"]);
    // Inside the example's New Year freeze the first one is refused as well.
    assert!(first_ok || first.contains("denyWindows[0]"), "{first}");
    let started = Instant::now();
    let (ok, out) = kubectl(kc, &["delete", "pod", &game[1], "--wait=false"]);
    assert!(!ok, "a second game server within 30 minutes: {out}");
    assert!(
        out.contains("RiskPolicy") && out.contains("game-server-safety"),
        "{out}"
    );
    assert!(
        out.contains("maxDeletions[0]") || out.contains("denyWindows[0]"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "kubectl must not sit on a 429"
    );
    assert!(get_json(kc, &["pod", &game[1]])["metadata"]["name"] == game[1].as_str());

    // API: one replica in every city of eu-west and us-east, nowhere else.
    wait_for("api in every city of two regions", 90, || {
        let p = pods("app=api");
        let running: Vec<_> = p.iter().filter(|p| p.1 == "Running").collect();
        let cities: std::collections::BTreeSet<String> = running
            .iter()
            .map(|p| label(&p.0, "topology.meridian.io/city"))
            .collect();
        for (node, _, _) in &running {
            let r = label(node, "topology.kubernetes.io/region");
            assert!(r == "eu-west" || r == "us-east", "api pod on {node} in {r}");
        }
        (running.len() == 15 && cities.len() == 15)
            .then_some(())
            .ok_or(format!("{} running in {cities:?}", running.len()))
    })
    .await;

    // Log pre-processor: on every CDN node of eu-west and only there.
    let cdn: std::collections::BTreeSet<String> = nodes
        .keys()
        .filter(|n| {
            label(n, "node.meridian.io/source") == "cdn"
                && label(n, "topology.kubernetes.io/region") == "eu-west"
        })
        .cloned()
        .collect();
    assert_eq!(cdn.len(), 7);
    wait_for("log pre-processor on every eu-west CDN node", 90, || {
        let p = pods("app=log-preprocessor");
        let on: std::collections::BTreeSet<String> = p
            .iter()
            .filter(|p| p.1 == "Running")
            .map(|p| p.0.clone())
            .collect();
        (on == cdn && p.len() == cdn.len())
            .then_some(())
            .ok_or(format!("{p:?}"))
    })
    .await;

    // Load test: 200 workers, 10 in each of exactly 20 cities, all succeeded.
    wait_for("load test completed over 20 cities", 120, || {
        // The Job first, then its pods: listed the other way round, a pod may
        // succeed in between and be counted by the Job but not in the list.
        let job = get_json(kc, &["job", "load-test"]);
        let p = pods("app=load-test");
        let done: Vec<_> = p.iter().filter(|p| p.1 == "Succeeded").collect();
        let mut per_city: std::collections::BTreeMap<String, usize> = Default::default();
        for (node, _, _) in &done {
            *per_city
                .entry(label(node, "topology.meridian.io/city"))
                .or_default() += 1;
        }
        if job["status"]["succeeded"] != 200 || done.len() != 200 {
            return Err(format!("{}; {per_city:?}", job["status"]));
        }
        assert_eq!(per_city.len(), 20, "{per_city:?}");
        assert!(per_city.values().all(|n| *n == 10), "{per_city:?}");
        Ok(())
    })
    .await;
}

/// Prints the end of a log when the test fails.
struct LogOnPanic(std::path::PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {}:", self.0.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Workloads outlive their agents by design; a test's must not outlive the test,
/// whether it passes or panics.
struct Reaper<'a>(&'a Path);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        meridian_agent::runtime::process::kill_leftovers(self.0);
        meridian_agent::runtime::containerd::kill_private_leftovers(&self.0.join("containerd"));
    }
}

/// `meridian up --runtime containerd`: the README's container example runs in a
/// real container from the region-served image, serves on its host port, logs
/// through kubectl; Ctrl-C (SIGTERM) takes every container down with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridian_up_with_containerd_runs_the_container_example() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(dir.path());
    let _log = LogOnPanic(dir.path().join("up.log"));
    let (mut up, kc) = up_with(dir.path(), &["--runtime", "containerd", "--no-simulated"]).await;
    let (ok, out) = kubectl(&kc, &["apply", "-f", &example("containerd-web.yaml")]);
    assert!(ok, "{out}");
    wait_for("edge-web serves", 90, || {
        let body = http_get_18080().unwrap_or_default();
        if body.contains("hello from a container on paris-1") {
            Ok(())
        } else {
            let (_, pods) = kubectl(&kc, &["get", "pods", "-o", "wide"]);
            Err(format!("{body:?}; {pods}"))
        }
    })
    .await;
    // The container can answer before its Running status has travelled up.
    wait_for("kubectl shows edge-web Running", 30, || {
        let (ok, out) = kubectl(&kc, &["get", "pods", "-l", "app=edge-web"]);
        if ok && out.contains("Running") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let pods = get_json(&kc, &["pods", "-l", "app=edge-web"]);
    let id = pods["items"][0]["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(id.starts_with("containerd://"), "{id}");
    let (ok, out) = kubectl(&kc, &["logs", "deploy/edge-web"]);
    assert!(ok && out.contains("serving on :18080"), "{out}");
    // kubectl exec runs inside the container (its filesystem: /www exists only
    // there); an interactive session is refused with a reason.
    let pod = pods["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!Path::new("/www/index.html").exists());
    let (ok, out) = kubectl(&kc, &["exec", &pod, "--", "sh", "-c", "ls /www; exit 4"]);
    assert!(!ok && out.contains("index.html"), "{out}");
    assert!(out.contains("command terminated with exit code 4"), "{out}");
    // An interactive session (-i): containerd's streaming exec.
    let mut sh = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["exec", "-i", &pod, "--", "sh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = sh.stdin.take().unwrap();
        stdin
            .write_all(b"echo from-$(cat /www/index.html | wc -l)-lines\nexit 5\n")
            .unwrap();
    }
    let out = sh.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "from-1-lines");
    // With a terminal (-t, through script(1)): containerd gives the shell one, and
    // kubectl's size reaches it.
    let mut sh = Command::new("script")
        .args([
            "-qec",
            &format!(
                "stty cols 90 rows 20; kubectl --kubeconfig {} exec -it {pod} -- sh",
                kc.display()
            ),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = sh.stdin.take().unwrap();
        stdin.write_all(b"tty; stty size; exit 6\n").unwrap();
    }
    let out = sh.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(
        text.contains("/dev/pts/") && text.contains("20 90"),
        "{text}"
    );
    // kubectl port-forward reaches the container's port through the node's agent.
    let local = free_port();
    let _pf = Proc(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kc)
            .args([
                "port-forward",
                &format!("pod/{pod}"),
                &format!("{local}:18080"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the container answers through port-forward", 30, || {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", local)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.contains("hello from a container on paris-1") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    // Only the pod's declared ports: with the node's network shared, anything else
    // (another tenant's pod, the node's own services) stays out of reach.
    let local = free_port();
    let mut pf = Proc(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kc)
            .args([
                "port-forward",
                &format!("pod/{pod}"),
                &format!("{local}:22"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for("kubectl listens and tries port 22", 30, || {
        use std::io::Read;
        let mut c =
            std::net::TcpStream::connect(("127.0.0.1", local)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.read(&mut [0u8; 16]);
        Ok(())
    })
    .await;
    let mut stderr = pf.0.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pf.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = pf.0.kill();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    assert!(
        err.contains("port 22 is not a containerPort of the pod"),
        "{err}"
    );
    // An ImagePrePull warms Paris; kubectl shows how far it got.
    let (ok, out) = kubectl(&kc, &["apply", "-f", &example("image-prepull.yaml")]);
    assert!(ok, "{out}");
    wait_for("the pre-pull reaches paris-1", 60, || {
        let (_, out) = kubectl(&kc, &["get", "ipp", "warm-busybox"]);
        // NAME IMAGES NODES PULLED FAILED AGE
        let row: Vec<&str> = out
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if row.get(1..5) == Some(&["1", "1", "1", "0"]) {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    // A public image cannot be pulled here: the pod says so in kubectl's STATUS.
    let (ok, out) = kubectl(
        &kc,
        &["run", "public", "--image=docker.io/library/nginx:1.27"],
    );
    assert!(ok, "{out}");
    wait_for("the public image's pull failure shows", 60, || {
        let (_, out) = kubectl(&kc, &["get", "pod", "public"]);
        if out.contains("ErrImagePull") || out.contains("ImagePullBackOff") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    // Ctrl-C: containerd and every container go away with `up`.
    let pid = up.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "meridian up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        http_get_18080().is_none(),
        "the container outlived meridian up"
    );
}

/// GET http://127.0.0.1:18080/index.html (the container example's port).
fn http_get_18080() -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
