//! Onboarding through the center with real processes: `meridian server`,
//! `meridian center`, three TLS regions behind delaying proxies (about 5, 40 and
//! 120 ms round trips), and agents joining with `meridian agent join`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::harness::*;

const REGIONS: [(&str, u64); 3] = [("near", 5), ("mid", 40), ("far", 120)];

struct Fleet {
    dir: tempfile::TempDir,
    server_port: u16,
    center_port: u16,
    ca_hash: String,
    client: kube::Client,
    procs: Vec<(String, Proc)>,
    proxies: Vec<DelayProxy>,
    agents: Vec<(String, Proc)>,
}

fn meridian(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

impl Fleet {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn log(&self, p: &str) -> PathBuf {
        self.path(&format!("{p}.log"))
    }

    /// Server, center (certificates living `cert_ttl`), and the three regions.
    async fn start(cert_ttl: &str) -> Fleet {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let (server_port, center_port) = (free_port(), free_port());
        let g = dir.path().join("global");
        let server = Proc::start(
            &[
                "server",
                "--data-dir",
                g.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{server_port}"),
            ],
            &dir.path().join("server.log"),
        );
        let token = g.join("system-region.token");
        eventually("the server's region token", Duration::from_secs(30), || {
            let t = token.clone();
            async move { t.exists() }
        })
        .await;
        let kc = kube::config::Kubeconfig::read_from(g.join("admin.kubeconfig")).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let mut f = Fleet {
            server_port,
            center_port,
            ca_hash: String::new(),
            client: kube::Client::try_from(cfg).unwrap(),
            procs: vec![("server".into(), server)],
            proxies: Vec::new(),
            agents: Vec::new(),
            dir,
        };
        let c = f.path("center");
        let global_args = |f: &Fleet| {
            vec![
                "--global".to_string(),
                format!("https://127.0.0.1:{}", f.server_port),
                "--token-file".into(),
                f.path("global/system-region.token").display().to_string(),
                "--ca-file".into(),
                f.path("global/pki/ca.crt").display().to_string(),
            ]
        };
        for (name, rtt) in REGIONS {
            let out = f.path(&format!("tls-{name}"));
            let o = meridian(&[
                "center",
                "serving-cert",
                "--data-dir",
                c.to_str().unwrap(),
                "--name",
                name,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let port = free_port();
            let proxy = DelayProxy::start(port, Duration::from_micros(rtt * 500)).await;
            let mut args: Vec<String> = vec!["region".into(), "--name".into(), name.into()];
            args.extend(global_args(&f));
            args.extend([
                "--listen".to_string(),
                format!("127.0.0.1:{port}"),
                "--advertise".into(),
                format!("https://127.0.0.1:{}", proxy.port),
                "--data-dir".into(),
                f.path(&format!("region-{name}")).display().to_string(),
                "--tls-cert".into(),
                out.join("tls.crt").display().to_string(),
                "--tls-key".into(),
                out.join("tls.key").display().to_string(),
                "--client-ca".into(),
                out.join("ca.crt").display().to_string(),
                "--lease-timeout".into(),
                "3s".into(),
                "--summary-interval".into(),
                "5s".into(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let p = Proc::start(&args, &f.log(&format!("region-{name}")));
            f.procs.push((format!("region-{name}"), p));
            f.proxies.push(proxy);
        }
        let mut args: Vec<String> = vec![
            "center".into(),
            "--data-dir".into(),
            c.display().to_string(),
        ];
        args.extend(global_args(&f));
        args.extend([
            "--listen".to_string(),
            format!("127.0.0.1:{center_port}"),
            "--region-refresh".into(),
            "500ms".into(),
            "--probes".into(),
            "3".into(),
            "--cert-ttl".into(),
            cert_ttl.into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::start(&args, &f.log("center"));
        f.procs.push(("center".into(), p));
        let ca = std::fs::read_to_string(c.join("pki/ca.crt")).unwrap();
        f.ca_hash = meridian_pki::ca_hash(&ca).unwrap();
        let api: Api<kube::core::DynamicObject> = Api::all_with(f.client.clone(), &edgeclusters());
        eventually("three regions register", Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                api.list(&Default::default())
                    .await
                    .is_ok_and(|l| l.items.len() == 3)
            }
        })
        .await;
        eventually(
            "the center listens",
            Duration::from_secs(30),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", center_port))
                    .await
                    .is_ok()
            },
        )
        .await;
        // The center reads regions every 500 ms.
        tokio::time::sleep(Duration::from_secs(1)).await;
        f
    }

    fn center_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.center_port)
    }

    /// `meridian token create` with `kubeconfig`; the token, or the error output.
    fn create_token(&self, kubeconfig: &Path, extra: &[&str]) -> Result<String, String> {
        let center = self.center_url();
        let ca = self.path("center/pki/ca.crt");
        let mut args = vec![
            "token",
            "create",
            "--center",
            &center,
            "--center-ca",
            ca.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = meridian(&args);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).to_string());
        }
        assert!(
            out.contains(&self.ca_hash),
            "the join command pins the CA: {out}"
        );
        Ok(out.split_whitespace().nth(1).unwrap().to_owned())
    }

    fn admin_token(&self, extra: &[&str]) -> String {
        self.create_token(&self.path("global/admin.kubeconfig"), extra)
            .unwrap()
    }

    fn join_args(&self, name: &str, token: &str) -> Vec<String> {
        [
            "agent",
            "join",
            "--center",
            &self.center_url(),
            "--token",
            token,
            "--ca-hash",
            &self.ca_hash,
            "--node-name",
            name,
            "--data-dir",
            self.path(&format!("agent-{name}")).to_str().unwrap(),
            "--heartbeat",
            "500ms",
            "--reconnect-max",
            "1s",
            "--replan-after",
            "4s",
            "--center-interval",
            "2s",
            "--source",
            "cdn",
            "--machine-type",
            "vm",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Starts `meridian agent join` for `name` and leaves it running.
    fn join(&mut self, name: &str, token: &str) {
        let args = self.join_args(name, token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::start(&args, &self.log(&format!("agent-{name}")));
        self.agents.push((name.to_owned(), p));
    }

    /// Runs a join expected to fail; returns its error output.
    fn join_refused(&self, name: &str, token: &str) -> String {
        let args = self.join_args(name, token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = meridian(&args);
        assert!(
            !o.status.success(),
            "join of {name} should have been refused"
        );
        assert!(
            !self.path(&format!("agent-{name}")).exists(),
            "a refused join leaves nothing behind on the node"
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    async fn region_of(&self, node: &str) -> Option<String> {
        let api: Api<Node> = Api::all(self.client.clone());
        let n = api.get_opt(node).await.ok()??;
        let ready = n
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let region = n.metadata.labels?.get("meridian.io/region").cloned()?;
        ready.then_some(region)
    }

    async fn wait_region(&self, node: &str, region: &str) {
        eventually(
            &format!("{node} Ready in region {region}"),
            Duration::from_secs(40),
            || async move { self.region_of(node).await.as_deref() == Some(region) },
        )
        .await;
    }

    fn kill(&mut self, name: &str) {
        if let Some((_, p)) = self.procs.iter_mut().find(|(n, _)| n == name) {
            p.kill9();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut logs: Vec<String> = self.procs.iter().map(|p| p.0.clone()).collect();
            logs.extend(self.agents.iter().map(|a| format!("agent-{}", a.0)));
            for f in logs {
                let text = std::fs::read_to_string(self.log(&f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- last lines of {f}.log ---");
                for l in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("{l}");
                }
            }
        }
        self.agents.clear();
        kill_workloads(self.dir.path());
    }
}

fn edgeclusters() -> kube::core::ApiResource {
    kube::core::ApiResource {
        group: "meridian.io".into(),
        version: "v1alpha1".into(),
        api_version: "meridian.io/v1alpha1".into(),
        kind: "EdgeCluster".into(),
        plural: "edgeclusters".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_the_nearest_region_then_the_next_best_and_move_when_their_region_dies() {
    let mut f = Fleet::start("720h").await;
    let token = f.admin_token(&["--uses", "10", "--labels", "meridian.io/pool=edge-a"]);
    f.join("n1", &token);
    f.join("n2", &token);
    f.wait_region("n1", "near").await;
    f.wait_region("n2", "near").await;
    // The token's labels reach the Node.
    let nodes: Api<Node> = Api::all(f.client.clone());
    let n1 = nodes.get("n1").await.unwrap();
    assert_eq!(
        n1.metadata
            .labels
            .unwrap()
            .get("meridian.io/pool")
            .map(String::as_str),
        Some("edge-a")
    );

    // The nearest region is full: the next node goes to the next best.
    let api: Api<kube::core::DynamicObject> = Api::all_with(f.client.clone(), &edgeclusters());
    api.patch(
        "near",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"maxNodes": 2}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.join("n3", &token);
    f.wait_region("n3", "mid").await;

    // A pod on n3 survives the move.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(f.client.clone(), "default");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "on-n3"},
        "spec": {"nodeName": "n3", "containers": [{"name": "c", "image": "busybox",
            "command": ["sh", "-c", "sleep 3600"]}]},
    }))
    .unwrap();
    pods.create(&Default::default(), &pod).await.unwrap();
    let running = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    };
    eventually("the pod on n3 runs", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { pods.get("on-n3").await.is_ok_and(|p| running(&p)) }
    })
    .await;
    let uid = pods.get("on-n3").await.unwrap().metadata.uid;

    // mid dies: n3 re-plans (near is full, mid unreachable) and lands in far.
    f.kill("region-mid");
    f.wait_region("n3", "far").await;
    let p = pods.get("on-n3").await.unwrap();
    assert_eq!(p.metadata.uid, uid, "the move did not replace the pod");
    assert!(running(&p), "the pod still runs after the move");
    let log = std::fs::read_to_string(f.log("agent-n3")).unwrap();
    assert!(log.contains("re-planned"), "n3 re-planned: {log}");
    // The new region watches pods by their node's region label: a pod bound to
    // n3 after the move reaches it too.
    let mut later = pod.clone();
    later.metadata.name = Some("after-move".into());
    pods.create(&Default::default(), &later).await.unwrap();
    eventually(
        "a pod bound after the move runs",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move { pods.get("after-move").await.is_ok_and(|p| running(&p)) }
        },
    )
    .await;

    // The inventory remembers the machine, its facts and its history.
    let inv = center_get(&f, "/v1/nodes").await;
    let n3 = inv
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nodeName"] == "n3")
        .unwrap();
    assert_eq!(n3["region"], "far");
    assert_eq!(n3["facts"]["source"], "cdn");
    let kinds: Vec<&str> = n3["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["joined", "moved"]);
    // n1 measured the three regions through the delaying proxies.
    let n1 = inv
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nodeName"] == "n1")
        .unwrap();
    let detail = n1["history"][0]["detail"].as_str().unwrap();
    let median = |region: &str| -> f64 {
        let part = detail
            .split("; ")
            .find(|p| p.starts_with(&format!("{region}:")))
            .unwrap();
        part.split("median ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (near, mid, far) = (median("near"), median("mid"), median("far"));
    assert!((4.0..30.0).contains(&near), "near {near} ms: {detail}");
    assert!((38.0..80.0).contains(&mid), "mid {mid} ms: {detail}");
    assert!((115.0..200.0).contains(&far), "far {far} ms: {detail}");
}

/// An admin GET on the center.
async fn center_get(f: &Fleet, path: &str) -> serde_json::Value {
    let ca = std::fs::read(f.path("center/pki/ca.crt")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let token = std::fs::read_to_string(f.path("global/admin.kubeconfig")).unwrap();
    let bearer = token
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let resp = client
        .get(format!("{}{path}", f.center_url()))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_leaving_nothing_and_a_certificate_is_only_its_node() {
    let mut f = Fleet::start("6s").await;
    // Tenants cannot make tokens, and a tenant's API token is no join token.
    let o = meridian(&[
        "tenant",
        "create",
        "acme",
        "--data-dir",
        f.path("global").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tenant_kc = f.path("global/tenants/acme.kubeconfig");
    let err = f.create_token(&tenant_kc, &[]).unwrap_err();
    assert!(err.contains("Forbidden"), "{err}");
    let tenant_bearer = std::fs::read_to_string(&tenant_kc)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("token: ")
                .map(|t| t.trim_matches('"').to_owned())
        })
        .unwrap();
    let err = f.join_refused("t1", &tenant_bearer);
    assert!(err.contains("TokenUnknown"), "{err}");

    let forged = "abcdef.0123456789abcdef";
    assert!(f.join_refused("t2", forged).contains("TokenUnknown"));
    let once = f.admin_token(&["--uses", "1"]);
    let expiring = f.admin_token(&["--ttl", "1s", "--uses", "5"]);
    let revoked = f.admin_token(&["--uses", "5"]);
    let id = revoked.split('.').next().unwrap();
    let o = meridian(&[
        "token",
        "revoke",
        id,
        "--center",
        &f.center_url(),
        "--center-ca",
        f.path("center/pki/ca.crt").to_str().unwrap(),
        "--kubeconfig",
        f.path("global/admin.kubeconfig").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(f.join_refused("t3", &revoked).contains("TokenRevoked"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(f.join_refused("t4", &expiring).contains("TokenExpired"));
    // A wrong CA pin: the agent does not talk to that center at all.
    let mut args = f.join_args("t5", &once);
    let pin = args.iter().position(|a| a == "--ca-hash").unwrap() + 1;
    args[pin] = format!("sha256:{}", "0".repeat(64));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = meridian(&args);
    assert!(String::from_utf8_lossy(&o.stderr).contains("man in the middle"));

    // Malformed requests get a reason and the offending field, and change nothing.
    let ca = std::fs::read(f.path("center/pki/ca.crt")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    for (body, want) in [
        (json!({}), "request body"),
        (
            json!({"token": once, "machineId": "m", "nodeName": "Bad_Name"}),
            "nodeName",
        ),
        (
            json!({"token": once, "machineId": "m", "nodeName": "ok", "facts": {"source": "moon"}}),
            "facts.source",
        ),
        (
            json!({"token": once, "machineId": "m", "nodeName": "ok", "facts": {"latitude": 91.0, "longitude": 0.0}}),
            "latitude",
        ),
    ] {
        let resp = http
            .post(format!("{}/v1/join", f.center_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let e: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(e["reason"], "Invalid");
        assert!(e["message"].as_str().unwrap().contains(want), "{e}");
    }
    let resp = http
        .post(format!("{}/v1/assign", f.center_url()))
        .json(&json!({"session": "nope", "probes": [], "csr": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // Eight machines race for the token's last use: exactly one gets in.
    let (client, _) = meridian_agent::join::CenterClient::discover(&f.center_url(), &f.ca_hash)
        .await
        .unwrap();
    let racers = (0..8).map(|i| {
        let client = client.clone();
        let dir = meridian_agent::join::IdentityDir::new(&f.path(&format!("race-{i}")));
        let once = once.clone();
        async move {
            let spec = meridian_agent::join::JoinSpec {
                node_name: format!("race-{i}"),
                ..Default::default()
            };
            meridian_agent::join::join(&client, Some(&once), &spec, &dir, None).await
        }
    });
    let results = futures::future::join_all(racers).await;
    let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(format!("{r:?}").contains("TokenUsedUp"), "{r:?}");
    }
    // Refused joins left nothing in the inventory.
    let inv = center_get(&f, "/v1/nodes").await;
    let names: Vec<&str> = inv
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nodeName"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("race-"));
    let tokens = center_get(&f, "/v1/tokens").await;
    let used: u64 = tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["used"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 1);

    // The winning machine joins again under another name: it keeps its identity.
    let winner = names[0].to_owned();
    let again = f.admin_token(&["--uses", "1"]);
    let dir = meridian_agent::join::IdentityDir::new(&f.path(&format!("race-{}", &winner[5..])));
    let spec = meridian_agent::join::JoinSpec {
        node_name: "renamed".into(),
        ..Default::default()
    };
    let a = meridian_agent::join::join(&client, Some(&again), &spec, &dir, None)
        .await
        .unwrap();
    assert_eq!(
        a.node_name, winner,
        "a re-joining machine keeps its node name"
    );
    let inv = center_get(&f, "/v1/nodes").await;
    let kinds: Vec<&str> = inv[0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["joined", "rejoined"]);

    // A real node, then its certificate used to be someone else.
    let token = f.admin_token(&["--uses", "2"]);
    f.join("alice", &token);
    f.wait_region("alice", "near").await;
    let alice = meridian_agent::join::IdentityDir::new(&f.path("agent-alice"));
    let saved = alice.saved().unwrap();
    let endpoint = saved.endpoint.clone();
    let status = attach_as(&alice, &endpoint, "bob").await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("cannot register as node \"bob\""));
    // Without a certificate no node registers at all.
    let ca = alice.ca_pem().unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca));
    let status = attach(tls, &endpoint, "alice").await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // The certificate names its region: it is no good in another one.
    let api: Api<kube::core::DynamicObject> = Api::all_with(f.client.clone(), &edgeclusters());
    let mid = api.get("mid").await.unwrap();
    let mid_endpoint = mid.data["spec"]["endpoint"].as_str().unwrap().to_owned();
    let status = attach_as(&alice, &mid_endpoint, "alice").await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // A node certificate is not a credential for the global API.
    let cert = alice.cert_pem().unwrap();
    let key = alice.key_pem().unwrap();
    let global_ca = std::fs::read(f.path("global/pki/ca.crt")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&global_ca).unwrap())
        .identity(reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = http
        .get(format!("https://127.0.0.1:{}/api/v1/nodes", f.server_port))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Renewal: the 6 s certificate is replaced before it expires, on the same
    // stream (the region sees one registration) and the node stays Ready.
    let first = meridian_pki::node_identity_pem(&cert).unwrap();
    eventually(
        "alice renews her certificate",
        Duration::from_secs(20),
        || {
            let alice = alice.clone();
            let first = first.clone();
            async move {
                alice
                    .cert_pem()
                    .ok()
                    .and_then(|c| meridian_pki::node_identity_pem(&c))
                    .is_some_and(|id| id.not_after > first.not_after)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        std::time::SystemTime::now() > first.not_after,
        "the first certificate has expired by now"
    );
    assert_eq!(f.region_of("alice").await.as_deref(), Some("near"));
    let log = std::fs::read_to_string(f.log("agent-alice")).unwrap();
    assert_eq!(log.matches("registered").count(), 1, "no reconnect: {log}");
    assert!(log.contains("node certificate renewed"));

    // A token may limit where its nodes go: carol's only allows far.
    let far_only = f.admin_token(&["--regions", "far"]);
    f.join("carol", &far_only);
    f.wait_region("carol", "far").await;

    // near drains: alice is told at her next check-in and moves to the next best;
    // near, still up, forgets her instead of marking her lost.
    api.patch(
        "near",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"draining": true}})),
    )
    .await
    .unwrap();
    f.wait_region("alice", "mid").await;
    eventually("near forgets alice", Duration::from_secs(30), || async {
        std::fs::read_to_string(f.log("region-near"))
            .unwrap()
            .contains("node moved to another region")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        f.region_of("alice").await.as_deref(),
        Some("mid"),
        "no flapping back"
    );
    assert_eq!(alice.saved().unwrap().region, "mid");
}

/// Opens an agent stream with `dir`'s certificate, registering as `node`.
async fn attach_as(
    dir: &meridian_agent::join::IdentityDir,
    endpoint: &str,
    node: &str,
) -> tonic::Status {
    attach(dir.client_tls().unwrap(), endpoint, node).await
}

async fn attach(
    tls: tonic::transport::ClientTlsConfig,
    endpoint: &str,
    node: &str,
) -> tonic::Status {
    use meridian_proto::{AgentMessage, Register, agent_message};
    use tokio_stream::StreamExt;
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = meridian_proto::agent_hub_client::AgentHubClient::new(channel);
    let register = AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            node_name: node.into(),
            facts: Some(meridian_proto::NodeFacts {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                max_pods: 10,
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    let out = tokio_stream::iter(vec![register]).chain(tokio_stream::pending());
    match client.attach(out).await {
        Ok(resp) => {
            let mut s = resp.into_inner();
            match s.message().await {
                Err(status) => status,
                Ok(m) => panic!("registered as {node}: {m:?}"),
            }
        }
        Err(status) => status,
    }
}
