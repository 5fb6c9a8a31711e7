//! The `meridian` binary as users run it: crash durability and the README's first
//! five minutes (`meridian up`, then kubectl).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

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
    let d = dir.path().to_str().unwrap().to_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("https://{listen}");
    let _reaper = Reaper(dir.path());
    let _up = meridian(&["up", "--data-dir", &d, "--listen", &listen]);
    wait_ready(&url, dir.path()).await;
    let kubeconfig = dir.path().join("tenants/demo.kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(
            Instant::now() < deadline,
            "meridian up wrote no tenant kubeconfig"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/web-deployment.yaml"
    );
    let (ok, out) = kubectl(&kubeconfig, &["apply", "--validate=false", "-f", example]);
    assert!(ok, "{out}");
    assert!(out.contains("deployment.apps/web created"), "{out}");
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
    let (ok, out) = kubectl(&kubeconfig, &["get", "namespaces", "-o", "name"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.trim(),
        "namespace/default",
        "the tenant sees only its own namespace"
    );
    let (ok, out) = kubectl(&kubeconfig, &["delete", "deployment", "web"]);
    assert!(ok, "{out}");

    // real nodes in several cities, visible to the tenant
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = kubectl(&kubeconfig, &["get", "nodes", "-o", "name"]);
        if ok && out.lines().count() == 5 {
            assert!(
                out.contains("node/paris-1") && out.contains("node/tokyo-1"),
                "{out}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "meridian up did not bring 5 nodes: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // a pod bound to a node runs there and its logs come back through kubectl
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/hello-pod.yaml");
    let (ok, out) = kubectl(&kubeconfig, &["apply", "--validate=false", "-f", hello]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = kubectl(&kubeconfig, &["logs", "hello"]);
        if ok && out.contains("hello from paris-1 in default") && out.contains("tick 1") {
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

    // the Deployment example is scheduled over three cities and runs (pods of the
    // first, deleted, Deployment may still be being collected: ignore those)
    let (_, before) = kubectl(&kubeconfig, &["get", "pods", "-l", "app=web", "-o", "name"]);
    let before: std::collections::BTreeSet<String> = before
        .lines()
        .map(|l| l.trim_start_matches("pod/").to_owned())
        .collect();
    let (ok, out) = kubectl(&kubeconfig, &["apply", "--validate=false", "-f", example]);
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

/// Workloads outlive their agents by design; a test's must not outlive the test,
/// whether it passes or panics.
struct Reaper<'a>(&'a Path);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        meridian_agent::runtime::process::kill_leftovers(self.0);
    }
}
